-- etcd v3 gateway puts with distinct keys: POST /v3/kv/put.
-- Keys are written directly in base64: $ETCD_KEY_B64 (a prefix whose length is a multiple
-- of 4) followed by 12 base64 characters (run letter, thread letter, 10 digits), which
-- decode to 9 distinct bytes. The value is $ETCD_VALUE_B64 for every key.
local next_id = 0
function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
end

function init(args)
   counter = 0
   prefix = os.getenv("ETCD_KEY_B64") .. os.getenv("RUN_TAG")
   value = os.getenv("ETCD_VALUE_B64")
   headers = { ["Content-Type"] = "application/json" }
end

function request()
   counter = counter + 1
   local key = prefix .. string.char(65 + tid) .. string.format("%010d", counter)
   return wrk.format("POST", "/v3/kv/put", headers,
                     '{"key":"' .. key .. '","value":"' .. value .. '"}')
end
