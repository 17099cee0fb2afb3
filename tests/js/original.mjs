// Agents written the way the original JavaScript Igora writes them (npm `yjs` +
// `y-websocket`, section 1 of the protocol), used by the compatibility tests.
//
//   node original.mjs client <market-url> <room> <prompt> [model]   put one task, print what is read
//     (model: as the original OpenAI endpoint passes its client's `model` through)
//   node original.mjs worker <market-url> <room>            serve tasks like the original worker
//
// The client prints JSON lines: {"ev":"partial","response":...} for each change of
// doing[id].response, then {"ev":"done","task":{...}} and exits 0 (1 on timeout).
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import { randomUUID } from 'node:crypto'

const [mode, url, room, prompt, model] = process.argv.slice(2)
const doc = new Y.Doc()
const todos = doc.getMap('todos')
const prepared = doc.getMap('prepared')
const doing = doc.getMap('doing')
const done = doc.getMap('done')
const provider = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true })
const awareness = provider.awareness
const id = randomUUID()
const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n')

function runClient () {
  awareness.setLocalState({ id, name: 'original-client', type: 'client', style: 'text', state: 'ready', date: Date.now() })
  const taskId = randomUUID()
  let last = null
  doing.observe(() => {
    const t = doing.get(taskId)
    if (t && t.response !== undefined && t.response !== last) {
      last = t.response
      emit({ ev: 'partial', response: t.response })
    }
  })
  done.observe(() => {
    const t = done.get(taskId)
    if (t) {
      emit({ ev: 'done', task: t })
      done.delete(taskId) // the original web client removes what it has read
      setTimeout(() => process.exit(0), 200)
    }
  })
  provider.once('sync', () => {
    todos.set(taskId, {
      id: taskId,
      asker: id,
      style: 'text',
      systemPrompt: 'You are a helpful assistant.',
      prompt,
      state: 'todo',
      temperature: 0.5,
      seed: 1,
      date: Date.now(),
      clientID: doc.clientID,
      ...(model ? { model } : {})
    })
  })
  setTimeout(() => { emit({ ev: 'timeout' }); process.exit(1) }, 60000)
}

function runWorker () {
  const setState = (state) => awareness.setLocalState({
    id, name: 'original-worker', type: 'worker', style: 'text', state, engine: 'node-echo', date: Date.now()
  })
  setState('ready')
  const busy = new Set()
  const serve = (taskId, task) => {
    busy.add(taskId)
    setState('working')
    doc.transact(() => {
      prepared.delete(taskId)
      doing.set(taskId, { ...task, state: 'doing' })
    })
    const words = ['Original', 'worker', 'says:', ...String(task.prompt || '').split(' ')]
    let response = ''
    let i = 0
    const timer = setInterval(() => {
      const current = doing.get(taskId)
      if (!current || current.aborted) { clearInterval(timer); busy.delete(taskId); setState('ready'); return }
      if (i < words.length) {
        const token = (i ? ' ' : '') + words[i++]
        response += token
        doing.set(taskId, { ...current, response, delta: { role: 'assistant', content: token }, chunkDate: Date.now() })
        return
      }
      clearInterval(timer)
      const end = Date.now()
      doc.transact(() => {
        doing.delete(taskId)
        done.set(taskId, { ...current, response, state: 'done', end, duration: end - current.start })
      })
      busy.delete(taskId)
      setState('ready')
      emit({ ev: 'served', id: taskId })
    }, 20)
  }
  prepared.observe(() => {
    prepared.forEach((task, taskId) => {
      if (task && task.worker === id && !busy.has(taskId)) serve(taskId, task)
    })
  })
  provider.once('sync', () => emit({ ev: 'ready', id }))
}

if (mode === 'client') runClient()
else if (mode === 'worker') runWorker()
else { console.error('usage: node original.mjs client|worker <url> <room> [prompt]'); process.exit(2) }
