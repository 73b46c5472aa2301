'use strict';
// Electron main process: owns the worker (through the Node client) and bridges it to the window.
// Run: MODEL=/path/to/model npx electron host_examples/electron   (Electron is not a dependency here)
const path = require('node:path');
const { app, BrowserWindow, ipcMain } = require('electron');
const { WorkerClient } = require('../node/worker_client');
const { Bridge } = require('./bridge');

const root = path.join(__dirname, '..', '..');
const client = new WorkerClient({ command: [process.env.MLX_WORKER_PYTHON || path.join(root, '.venv/bin/python'), '-m', 'worker'], cwd: root });

app.whenReady().then(async () => {
  const win = new BrowserWindow({ width: 800, height: 600, webPreferences: { preload: path.join(__dirname, 'preload.js'), contextIsolation: true } });
  const bridge = new Bridge(client, win.webContents);
  bridge.register(ipcMain);
  client.on('restarted', () => client.load(process.env.MODEL).catch(() => {}));
  await win.loadFile(path.join(__dirname, 'index.html'));
  await client.start();
  await client.load(process.env.MODEL);
});
app.on('before-quit', () => { client.close(); });
app.on('window-all-closed', () => app.quit());
