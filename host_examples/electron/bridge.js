'use strict';
// UI-free bridge between a WorkerClient and a renderer: handles 'generate' / 'cancel' IPC calls and
// forwards each event to sink.send(channel, payload) (webContents.send in Electron, a fake in tests).
class Bridge {
  constructor(client, sink) { this.client = client; this.sink = sink; this.n = 0; this.active = new Set(); }
  // Returns the request id at once; events flow to the sink on 'worker:event'.
  generate({ prompt, params = {} }) {
    const id = `ui-${++this.n}`;
    const stream = this.client.generate(prompt, params, { id });
    this.active.add(id);
    (async () => {
      try { for await (const ev of stream) this.sink.send('worker:event', ev); }
      catch (e) { this.sink.send('worker:event', { type: 'error', id, code: 'worker_crashed', message: e.message }); }
      finally { this.active.delete(id); }
    })();
    return id;
  }
  async cancel({ id }) { return this.client.cancel(id); }
  // Wire to Electron's ipcMain (or anything with handle(channel, fn)).
  register(ipcMain) {
    ipcMain.handle('worker:generate', (_e, args) => this.generate(args));
    ipcMain.handle('worker:cancel', (_e, args) => this.cancel(args));
  }
}
module.exports = { Bridge };
