-- GETs of the URL given to wrk at a fixed rate: $RATE requests/s per wrk thread (run -t1),
-- open loop as far as wrk allows. Each time a connection is free, delay() gives it the next
-- slot of one schedule (slot k at start + k/RATE), so the offered rate stays RATE whatever the
-- latency, as long as some connection is free at each slot. wrk releases delayed requests on
-- its millisecond timer, so about RATE/1000 requests leave together each millisecond, and it
-- measures latency from the write, not from the slot (no correction for coordinated omission:
-- keep enough connections that one is always free). LuaJIT's ffi gives the clock.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } rate_timespec;
int clock_gettime(int clk_id, rate_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("rate_timespec")

local function now_ms()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
   return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local interval_ms, next_slot

function init(args)
   interval_ms = 1000 / tonumber(os.getenv("RATE"))
end

function delay()
   local now = now_ms()
   if next_slot == nil then
      next_slot = now
   end
   local wait = next_slot - now
   next_slot = next_slot + interval_ms
   if wait < 0 then
      return 0
   end
   return wait
end
