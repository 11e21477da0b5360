-- Heartbeats cycling through $INSTANCES instances of service $SERVICE (ids i-0 .. i-N-1):
-- PUT /api/v1/services/<service>/instances/i-K/heartbeat, requests built once in init().
local next_id = 0
function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
end

function init(args)
   n = tonumber(os.getenv("INSTANCES"))
   local service = os.getenv("SERVICE")
   reqs = {}
   for k = 0, n - 1 do
      reqs[k] = wrk.format("PUT",
         string.format("/api/v1/services/%s/instances/i-%d/heartbeat", service, k))
   end
   counter = tid * 7919
end

function request()
   counter = counter + 1
   return reqs[counter % n]
end
