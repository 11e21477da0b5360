-- Appended after a request script: deals wrk's threads out over the servers on 127.0.0.1
-- whose ports are in $TARGET_PORTS (space-separated; thread k talks to port k mod n). Run
-- wrk with one connection per thread (-tN -cN) so the connections spread evenly too.
local inner_setup = setup
local spread_ports = {}
for p in string.gmatch(os.getenv("TARGET_PORTS") or "", "%d+") do
   spread_ports[#spread_ports + 1] = p
end
local spread_next = 0
function setup(thread)
   if #spread_ports > 0 then
      local port = spread_ports[(spread_next % #spread_ports) + 1]
      thread.addr = wrk.lookup("127.0.0.1", port)[1]
   end
   spread_next = spread_next + 1
   if inner_setup then
      inner_setup(thread)
   end
end
