-- A plain GET of the URL given to wrk, with the Accept header from $ACCEPT (wrk's pre-built
-- request; no per-request Lua).
wrk.headers["Accept"] = os.getenv("ACCEPT")
