# tally worker against real Postgres and tally devbroker.
function(tally_worker_test name)
  add_test(NAME integration_${name}
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_${name}.sh
                   $<TARGET_FILE:tally> $<TARGET_FILE:tally-gen> ${ARGN})
  set_tests_properties(integration_${name} PROPERTIES
                       TIMEOUT 600 LABELS integration RUN_SERIAL TRUE)
endfunction()

tally_worker_test(worker_totals 300000)
tally_worker_test(worker_race)
# Robustness and contract details (each well under 2 minutes).
tally_worker_test(worker_kill9)
tally_worker_test(worker_pg_restart)
tally_worker_test(worker_group)
tally_worker_test(worker_dlq)
tally_worker_test(worker_dedupe)
tally_worker_test(worker_batch_idle)
tally_worker_test(cli)

# cache.c against a private redis-server (tests/unit/test_cache_redis.c).
add_test(NAME integration_cache
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_cache.sh
                 $<TARGET_FILE:test_cache_redis>)
set_tests_properties(integration_cache PROPERTIES
                     TIMEOUT 300 LABELS integration)
tally_worker_test(worker_invalidation)

# The fault suite (tests/integration/test_fault_*.sh): each ends on exact
# totals against what was produced.
tally_worker_test(fault_poison)
tally_worker_test(fault_rolling)
tally_worker_test(fault_config)
tally_worker_test(fault_crash_points)
tally_worker_test(fault_broker)
tally_worker_test(fault_postgres)
# Windows (several batches a transaction) under SIGKILL: the store's,
# driven by tally-pgstage, and the worker's (--commit-batches).
tally_worker_test(store_window_kill9 $<TARGET_FILE:tally-pgstage>)
tally_worker_test(worker_window_kill9)

# Two tests again with the worker under valgrind memcheck (label
# valgrind): worker_dlq (every reason code's error path and the
# dead-letter producer) and worker_invalidation (the invalidation
# pipeline, Redis and Postgres outages), each ending in a SIGTERM stop,
# with no invalid access and no definite or indirect leak allowed (exit
# 99 fails it_worker_stop). Only in builds without sanitizers, which
# valgrind cannot run. valgrind.supp says what it suppresses and why.
find_program(TALLY_VALGRIND valgrind)
if(TALLY_VALGRIND AND NOT TALLY_SANITIZE)
  set(vg ${TALLY_VALGRIND} --error-exitcode=99 --leak-check=full
         --show-leak-kinds=definite,indirect,possible
         --errors-for-leak-kinds=definite,indirect --num-callers=40
         --suppressions=${CMAKE_CURRENT_LIST_DIR}/valgrind.supp)
  list(JOIN vg " " vg)
  foreach(name worker_dlq worker_invalidation)
    add_test(NAME integration_${name}_valgrind
             COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_${name}.sh
                     $<TARGET_FILE:tally> $<TARGET_FILE:tally-gen>)
    set_tests_properties(integration_${name}_valgrind PROPERTIES
                         TIMEOUT 900 LABELS "integration;valgrind"
                         RUN_SERIAL TRUE ENVIRONMENT "IT_WORKER_WRAPPER=${vg}")
  endforeach()
endif()
# Peak RSS means nothing under ASan (shadow memory, quarantine): in
# builds without sanitizers only (label rss; scripts/test.sh runs it in
# its optimised build).
if(NOT TALLY_SANITIZE)
  tally_worker_test(fault_large)
  set_tests_properties(integration_fault_large PROPERTIES
                       LABELS "integration;rss")
  tally_worker_test(worker_rss)
  set_tests_properties(integration_worker_rss PROPERTIES
                       LABELS "integration;rss")
endif()
tally_worker_test(ops_scale)
