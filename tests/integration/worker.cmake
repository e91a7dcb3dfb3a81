# tally worker against real Postgres and tally devbroker.
function(tally_worker_test name)
  add_test(NAME integration_${name}
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_${name}.sh
                   $<TARGET_FILE:tally> $<TARGET_FILE:tally-gen> ${ARGN})
  set_tests_properties(integration_${name} PROPERTIES
                       TIMEOUT 600 LABELS integration RUN_SERIAL TRUE)
endfunction()

tally_worker_test(worker_totals 300000)
