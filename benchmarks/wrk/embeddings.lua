-- wrk script for `make bench`: POST /v1/embeddings, OpenAI's body, TEXTS texts per request drawn in
-- turn from 512 distinct sentences (so no server can cache an answer). Costs wrk a few microseconds.
--   wrk -s benchmarks/wrk/embeddings.lua URL -- MODEL TEXTS
local words = {"serving", "model", "online", "batch", "replica", "latency", "queue", "token",
               "request", "vector", "cluster", "node", "throughput", "capacity", "deploy", "scale"}
local bodies = {}
local next_body = 1

function init(args)
  local model = args[1] or "all-MiniLM-L6-v2"
  local texts = tonumber(args[2] or "1")
  for i = 1, 512 do
    local items = {}
    for j = 1, texts do
      local k = (i * 31 + j * 7)
      items[j] = string.format('"Request %d asks about %s and %s near the %s."', k,
        words[k % 16 + 1], words[(k * 3) % 16 + 1], words[(k * 5) % 16 + 1])
    end
    local input = texts == 1 and items[1] or ("[" .. table.concat(items, ",") .. "]")
    bodies[i] = string.format('{"model": "%s", "input": %s}', model, input)
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local body = bodies[next_body]
  next_body = next_body % 512 + 1
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  io.write(string.format("JSON {\"requests\": %d, \"duration_us\": %d, \"errors_status\": %d, " ..
    "\"errors_other\": %d, \"p50_ms\": %.2f, \"p90_ms\": %.2f, \"p99_ms\": %.2f, \"max_ms\": %.2f}\n",
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
