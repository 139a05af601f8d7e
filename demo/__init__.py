"""`make demo` (`python -m demo`): the whole loop on a generated competition. It sits above train, export and
local_eval and imports all three; none of them imports it."""
