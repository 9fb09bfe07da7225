"""Load tests: k6 and Locust scenarios, a runner that sizes and starts everything, and its report.

`python -m loadtests.run SCENARIO` (`make load SCENARIO=...`): see `loadtests/run.py`.
"""
