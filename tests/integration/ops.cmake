# tally offsets and tally reconcile against real Postgres and tally devbroker.
tally_worker_test(ops_offsets)
tally_worker_test(ops_reconcile)
