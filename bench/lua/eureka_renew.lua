-- Eureka renewals cycling through $INSTANCES instances of application $APP (ids r-0 .. r-N-1):
-- PUT /eureka/apps/<APP>/r-K?status=UP&lastDirtyTimestamp=1, as Eureka clients send them;
-- requests built once in init().
local next_id = 0
function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
end

function init(args)
   n = tonumber(os.getenv("INSTANCES"))
   local app = os.getenv("APP")
   reqs = {}
   for k = 0, n - 1 do
      reqs[k] = wrk.format("PUT",
         string.format("/eureka/apps/%s/r-%d?status=UP&lastDirtyTimestamp=1", app, k))
   end
   counter = tid * 7919
end

function request()
   counter = counter + 1
   return reqs[counter % n]
end
