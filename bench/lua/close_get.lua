-- A plain GET of the URL given to wrk with `Connection: close` (bench/https.sh): the server
-- closes after each answer and wrk connects again, so every request costs a new TCP
-- connection and TLS handshake. The request is built once.
wrk.headers["Connection"] = "close"
