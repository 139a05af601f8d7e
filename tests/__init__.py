"""The kit's tests."""

# The longest any test waits on a subprocess or for something a subprocess makes: a guard against a hang, never a
# speed check (a 2-core machine under load 6 runs everything several times slower).
HANG_GUARD_S = 1800
