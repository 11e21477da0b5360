-- A plain GET of the URL given to wrk with `X-Consul-Token: $ACL_TOKEN` (bench/acl.sh), the
-- request built once.
wrk.headers["X-Consul-Token"] = os.getenv("ACL_TOKEN")
