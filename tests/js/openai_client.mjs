// The official openai package for JavaScript against a gateway: prints what each call
// gave as one JSON line. Used by tests/test_gateway.py:
//   node openai_client.mjs BASE_URL MODEL
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "none", maxRetries: 0 });
const out = {};

const chat = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "hello there" }],
});
out.chat = chat.choices[0].message.content;
out.task = chat.id;

const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "one two three" }],
  stream: true,
  stream_options: { include_usage: true },
});
out.streamed = "";
for await (const chunk of stream) {
  out.streamed += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) out.usage = chunk.usage;
}

const response = await client.responses.create({ model, input: "plain text" });
out.responses = response.output_text;
const runner = client.responses.stream({ model, input: "streamed text" });
out.responseEvents = [];
runner.on("event", (event) => out.responseEvents.push(event.type));
out.responsesStreamed = (await runner.finalResponse()).output_text;

const vectors = await client.embeddings.create({ model, input: ["a cat", "a dog"] });
out.dimensions = vectors.data.map((d) => d.embedding.length);

try {
  await client.chat.completions.create({ model: "nobody-serves-this", messages: [{ role: "user", content: "x" }] });
} catch (err) {
  out.error = { status: err.status, code: err.code, type: err.constructor.name };
}
console.log(JSON.stringify(out));
