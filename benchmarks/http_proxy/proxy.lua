-- wrk script for benchmarks/http_proxy.py (requests in absolute form through an HTTP proxy) and
-- benchmarks/dns_proxy.py (origin-form requests through a TCP forwarder).
--
-- wrk connects to the address on its command line (the proxy, 198.51.100.1:8080) and sends
--   GET http://203.0.113.10/1k HTTP/1.1 / Host: 203.0.113.10
-- Settings come from the environment (wrk passes no arguments to the Lua side before init):
--   WRK_TARGET    absolute URL to ask the proxy for (default http://203.0.113.10/1k), or an
--                 origin-form path such as /1k (a TCP forwarder passes requests on unchanged)
--   WRK_HOST      the Host header for an origin-form WRK_TARGET (default 203.0.113.10)
--   WRK_CLOSE     "1": send "Connection: close", so every request is a new connection
--   WRK_RATE      > 0: pace this wrk thread to about this many requests per second. After each
--                 response, delay() gives the connection the next free send slot of a fixed
--                 schedule (1/WRK_RATE apart, monotonic clock through LuaJIT's ffi), so the rate
--                 does not depend on the latency as long as some connection is free; slots that
--                 pass while every connection is busy are dropped, not sent late in a burst.
--                 wrk measures latency from the moment a request is written, so waiting for a
--                 slot is not counted.
-- At the end it writes one line "WRKJSON {...}" with counts and latency percentiles in
-- microseconds, which the benchmark parses (wrk's own text summary rounds them).

local target = os.getenv("WRK_TARGET") or "http://203.0.113.10/1k"
local close = os.getenv("WRK_CLOSE") == "1"
local rate = tonumber(os.getenv("WRK_RATE") or "0") or 0

wrk.method = "GET"
wrk.path = target
wrk.headers["Host"] = string.match(target, "^%a+://([^/]+)") or os.getenv("WRK_HOST") or "203.0.113.10"
if close then
  wrk.headers["Connection"] = "close"
end

if rate > 0 then
  local ffi = require("ffi")
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } egr_timespec;
    int clock_gettime(int clk_id, egr_timespec *tp);
  ]]
  local CLOCK_MONOTONIC = 1
  local ts = ffi.new("egr_timespec")
  local interval = 1 / rate
  local next_slot = nil

  local function now()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
  end

  function delay()
    local t = now()
    if next_slot == nil or next_slot < t then
      next_slot = t
    end
    local wait = next_slot - t
    next_slot = next_slot + interval
    return math.floor(wait * 1000)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, '
    .. '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, '
    .. '"p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
