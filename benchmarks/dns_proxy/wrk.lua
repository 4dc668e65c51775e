-- wrk script for benchmarks/dns_proxy.py: plain "GET /1k" through a TCP forwarder to nginx.
--
-- The proxy only relays bytes, so the request is an ordinary origin-form GET with Host set to the
-- origin. Settings come from the environment:
--   WRK_CLOSE  "1": send "Connection: close", so every request is a new connection
--   WRK_RATE   > 0: pace this wrk thread to about this many requests per second: after each
--              response, delay() gives the connection the next free slot of a fixed schedule
--              (1/WRK_RATE apart, monotonic clock through LuaJIT's ffi); slots that pass while
--              every connection is busy are dropped, not sent late in a burst. wrk measures latency
--              from when a request is written, so waiting for a slot does not count.
-- At the end it writes "WRKJSON {...}" (counts; latency percentiles in microseconds).

local close = os.getenv("WRK_CLOSE") == "1"
local rate = tonumber(os.getenv("WRK_RATE") or "0") or 0

wrk.method = "GET"
wrk.path = "/1k"
wrk.headers["Host"] = "203.0.113.10"
if close then
  wrk.headers["Connection"] = "close"
end

if rate > 0 then
  local ffi = require("ffi")
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } dnsb_timespec;
    int clock_gettime(int clk_id, dnsb_timespec *tp);
  ]]
  local ts = ffi.new("dnsb_timespec")
  local interval = 1 / rate
  local next_slot = nil

  local function now()
    ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
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
    .. '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
