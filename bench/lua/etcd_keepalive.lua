-- etcd v3 gateway lease keep-alives cycling through the lease ids in $LEASES_FILE:
-- POST /v3/lease/keepalive {"ID": "..."} (one keep-alive per HTTP request).
local next_id = 0
function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
end

function init(args)
   local headers = { ["Content-Type"] = "application/json" }
   reqs = {}
   n = 0
   for line in io.lines(os.getenv("LEASES_FILE")) do
      if line ~= "" then
         reqs[n] = wrk.format("POST", "/v3/lease/keepalive", headers, '{"ID":"' .. line .. '"}')
         n = n + 1
      end
   end
   counter = tid * 7919
end

function request()
   counter = counter + 1
   return reqs[counter % n]
end
