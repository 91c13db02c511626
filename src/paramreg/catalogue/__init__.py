"""The catalogue: regularizers as pure tensor math (penalty, proximal map, projection, groupings).

Nothing here imports the mechanism (modules/, optim/, lifecycle/, tools/); docs/design.md has the
layout and tests/test_layout.py checks it.
"""
