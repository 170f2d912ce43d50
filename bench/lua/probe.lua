-- A paced GET (headers given with -H): one request every args[1] milliseconds,
-- to sample latency without adding load of its own.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")

function init(args)
  pause = tonumber(args[1])
end

function delay()
  return pause
end
