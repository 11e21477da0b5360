-- etcd v3 gateway range read: POST /v3/kv/range with the body in $ETCD_RANGE_BODY.
wrk.method = "POST"
wrk.path = "/v3/kv/range"
wrk.body = os.getenv("ETCD_RANGE_BODY")
wrk.headers["Content-Type"] = "application/json"
