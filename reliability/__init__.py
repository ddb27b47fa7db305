"""The reliability and security scorecard (docs/reliability.md).

The tests under ``tests/reliability`` are the source of every figure: each test
asserts its budget and also hands what it measured to :mod:`reliability.scorecard`.
In the default suite the recorder is silent and the tests run at their CI size;
``python -m reliability`` (``make reliability``) runs the same tests at full size
(20 repeats per timed fault, longer fuzzing), collects the records and renders the
page. One set of tests, so the page cannot drift from what CI checks.
"""
