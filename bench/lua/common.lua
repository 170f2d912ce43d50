-- Shared by every bench script: thread ids, and one JSON result line at the end.
-- Scripts may keep a per-thread global `bad` (responses they judged wrong).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + (thread:get("bad") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"status_errors":%d,"bad":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, bad, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end

-- Lines `i` of `path` with i % nthreads == id - 1: this thread's share.
function read_share(path, nthreads)
  local share, i = {}, 0
  for line in io.lines(path) do
    if line ~= "" then
      if i % nthreads == id - 1 then share[#share + 1] = line end
      i = i + 1
    end
  end
  return share
end
