-- etcd v3 gateway compare-and-set transactions on distinct keys: POST /v3/kv/txn, "create
-- the key if it does not exist" (create_revision == 0, then put), the transaction a
-- registry without group commit would send per registration.
-- Keys are written directly in base64: $ETCD_KEY_B64 (a prefix whose length is a multiple
-- of 4) followed by 12 base64 characters (run letter, thread character, 10 digits), which
-- decode to 9 distinct bytes; up to 64 threads. The value is $ETCD_VALUE_B64 for every key.
local next_id = 0
function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
end

local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

function init(args)
   counter = 0
   prefix = os.getenv("ETCD_KEY_B64") .. os.getenv("RUN_TAG") .. string.sub(alphabet, tid % 64 + 1, tid % 64 + 1)
   value = os.getenv("ETCD_VALUE_B64")
   headers = { ["Content-Type"] = "application/json" }
end

function request()
   counter = counter + 1
   local key = prefix .. string.format("%010d", counter)
   return wrk.format("POST", "/v3/kv/txn", headers,
      '{"compare":[{"target":"CREATE","result":"EQUAL","key":"' .. key ..
      '","create_revision":"0"}],"success":[{"request_put":{"key":"' .. key ..
      '","value":"' .. value .. '"}}]}')
end
