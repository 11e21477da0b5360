-- Appended to every wrk script: prints one JSON line with the run's figures.
-- ok_rps counts only 2xx/3xx answers.
function done(summary, latency, requests)
   local e = summary.errors
   local secs = summary.duration / 1e6
   io.write(string.format(
      'WRKJSON {"requests":%d,"non2xx":%d,"socket_errors":%d,"seconds":%.3f,' ..
      '"rps":%.1f,"ok_rps":%.1f,"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f}\n',
      summary.requests, e.status, e.connect + e.read + e.write + e.timeout, secs,
      summary.requests / secs, (summary.requests - e.status) / secs,
      latency:percentile(50) / 1000, latency:percentile(90) / 1000,
      latency:percentile(99) / 1000, latency.max / 1000))
end
