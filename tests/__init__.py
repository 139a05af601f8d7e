"""The kit's tests."""

# The longest any test waits on a subprocess or for something a subprocess makes: a guard against a hang, never a
# speed check (a 2-core machine under load 6 runs everything several times slower).
HANG_GUARD_S = 1800

# The script's light settings for tests: two scales (global from both), at most 200 local features, verification
# in the script's own process. Test files add what they need.
LIGHT = ["--scales", "0.5", "1.0", "--global-scale-indices", "0", "1", "--max-features", "200", "--workers", "0"]
