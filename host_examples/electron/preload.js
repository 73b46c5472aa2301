'use strict';
const { contextBridge, ipcRenderer } = require('electron');
contextBridge.exposeInMainWorld('worker', {
  generate: (prompt, params) => ipcRenderer.invoke('worker:generate', { prompt, params }),
  cancel: (id) => ipcRenderer.invoke('worker:cancel', { id }),
  onEvent: (fn) => ipcRenderer.on('worker:event', (_e, ev) => fn(ev)),
});
