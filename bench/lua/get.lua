-- GET with fixed headers (given with -H): the bare endpoint, or /protected with one token.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
