-- muster registrations with distinct instance ids, spread over $SERVICES services:
-- PUT /api/v1/services/reg-N/instances/<run><thread>-<counter> with the body in $REGISTER_BODY.
local next_id = 0
function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
end

function init(args)
   counter = 0
   run = os.getenv("RUN_TAG")
   services = tonumber(os.getenv("SERVICES"))
   body = os.getenv("REGISTER_BODY")
   headers = { ["Content-Type"] = "application/json" }
end

function request()
   counter = counter + 1
   local path = string.format("/api/v1/services/reg-%d/instances/%s%d-%d",
                              counter % services, run, tid, counter)
   return wrk.format("PUT", path, headers, body)
end
