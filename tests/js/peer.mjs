// A peer of the original Igora stack (npm `yjs` + `y-websocket`), driven by the Python tests.
//
//   node peer.mjs <market-url> <room> [name] [--silent]
//
// --silent: join with no awareness state of its own (like a page that only watches).
//
// stdin, one JSON command per line:
//   {"op": "set", "map": "todos", "key": "k", "value": {...}}
//   {"op": "delete", "map": "todos", "key": "k"}
//   {"op": "aware", "state": {...} | null}       set (or clear) the local awareness state
//   {"op": "exit"}
// stdout, one JSON event per line:
//   {"ev": "status", "status": "connected" | "disconnected" | "connecting"}
//   {"ev": "synced"}
//   {"ev": "doc", "maps": {"todos": {...}, "prepared": {...}, "doing": {...}, "done": {...}}}
//   {"ev": "awareness", "self": <clientID>, "states": {"<clientID>": state, ...}}
//   {"ev": "error", "message": "..."}
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import readline from 'node:readline'

const args = process.argv.slice(2)
const silent = args.includes('--silent')
const [url, room, name = 'node-peer'] = args.filter((a) => a !== '--silent')
if (!url || !room) {
  console.error('usage: node peer.mjs <market-url> <room> [name]')
  process.exit(2)
}

const MAPS = ['todos', 'prepared', 'doing', 'done']
const doc = new Y.Doc()
const maps = Object.fromEntries(MAPS.map((m) => [m, doc.getMap(m)]))
const provider = new WebsocketProvider(url, room, doc, {
  WebSocketPolyfill: WebSocket,
  disableBc: true,
  maxBackoffTime: 1000,
  connect: false
})
const awareness = provider.awareness
if (silent) awareness.setLocalState(null)
provider.connect()

const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n')

provider.on('status', ({ status }) => emit({ ev: 'status', status }))
provider.on('sync', (synced) => { if (synced) emit({ ev: 'synced' }) })
doc.on('update', () => {
  emit({ ev: 'doc', maps: Object.fromEntries(MAPS.map((m) => [m, maps[m].toJSON()])) })
})
awareness.on('change', () => {
  const states = {}
  awareness.getStates().forEach((state, id) => { states[id] = state })
  emit({ ev: 'awareness', self: doc.clientID, states })
})

const rl = readline.createInterface({ input: process.stdin })
rl.on('line', (line) => {
  if (!line.trim()) return
  let cmd
  try {
    cmd = JSON.parse(line)
  } catch (e) {
    emit({ ev: 'error', message: `bad command: ${e.message}` })
    return
  }
  if (cmd.op === 'set') {
    maps[cmd.map].set(cmd.key, cmd.value)
  } else if (cmd.op === 'delete') {
    maps[cmd.map].delete(cmd.key)
  } else if (cmd.op === 'aware') {
    awareness.setLocalState(cmd.state === null ? null : { name, ...cmd.state })
  } else if (cmd.op === 'exit') {
    provider.destroy()
    process.exit(0)
  } else {
    emit({ ev: 'error', message: `unknown op ${cmd.op}` })
  }
})
rl.on('close', () => { provider.destroy(); process.exit(0) })
