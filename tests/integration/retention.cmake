# Retention of the dedupe store (tests/integration/test_ops_retention.sh):
# expired events pruned while the worker counts. tally_worker_test comes
# from worker.cmake, included before this file.
tally_worker_test(ops_retention)
