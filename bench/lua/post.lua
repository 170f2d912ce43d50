-- POST a fixed body: args = body, [expected text]. JSON unless a Content-Type was
-- given with -H; with an expected text, an answer without it counts as bad.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")

function init(args)
  wrk.method = "POST"
  wrk.body = args[1]
  if not wrk.headers["Content-Type"] then
    wrk.headers["Content-Type"] = "application/json"
  end
  bad = 0
  if args[2] and args[2] ~= "" then
    local expected = args[2]
    response = function(status, headers, body)
      if not body:find(expected, 1, true) then bad = bad + 1 end
    end
  end
end
