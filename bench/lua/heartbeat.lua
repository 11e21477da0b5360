-- Heartbeats cycling through $INSTANCES instances of service $SERVICE (ids i-0 .. i-N-1):
-- PUT /api/v1/services/<service>/instances/i-K/heartbeat, requests built once in init().
-- $HEARTBEAT_PATH, a format of the service and K, sends another API's heartbeat instead
-- (bench/eureka.sh: Eureka renewals).
local next_id = 0
function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
end

function init(args)
   n = tonumber(os.getenv("INSTANCES"))
   local service = os.getenv("SERVICE")
   local path = os.getenv("HEARTBEAT_PATH") or "/api/v1/services/%s/instances/i-%d/heartbeat"
   reqs = {}
   for k = 0, n - 1 do
      reqs[k] = wrk.format("PUT", string.format(path, service, k))
   end
   counter = tid * 7919
end

function request()
   counter = counter + 1
   return reqs[counter % n]
end
