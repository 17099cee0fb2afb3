// An unmodified yjs + y-websocket client joining a room, reporting how the market
// answers (used against a protocol-3 room, which refuses it).
//
//   node refused.mjs <market-url> <room>
//
// stdout, one JSON event per line, then exit after the first close:
//   {"ev": "denied", "message": "..."}     what y-websocket logs for a permission-denied message
//   {"ev": "close", "code": 4426, "reason": "..."}
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const [url, room] = process.argv.slice(2)
if (!url || !room) {
  console.error('usage: node refused.mjs <market-url> <room>')
  process.exit(2)
}
const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n')
const warn = console.warn
console.warn = (...args) => {
  const message = args.join(' ')
  if (message.startsWith('Permission denied')) emit({ ev: 'denied', message })
  else warn(...args)
}
const provider = new WebsocketProvider(url, room, new Y.Doc(), {
  WebSocketPolyfill: WebSocket,
  disableBc: true
})
let closed = false
provider.on('connection-close', (event) => {
  if (closed) return // destroy() below reports its own close
  closed = true
  emit({ ev: 'close', code: event ? event.code : null, reason: event ? event.reason : null })
  provider.destroy()
  process.exit(0)
})
setTimeout(() => { emit({ ev: 'timeout' }); process.exit(1) }, 20000)
