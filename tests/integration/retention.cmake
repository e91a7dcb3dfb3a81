# Retention of the dedupe store (tests/integration/test_ops_retention.sh):
# expired events pruned while the worker counts.
function(tally_retention_test name)
  add_test(NAME integration_${name}
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_${name}.sh
                   $<TARGET_FILE:tally> $<TARGET_FILE:tally-gen> ${ARGN})
  set_tests_properties(integration_${name} PROPERTIES
                       TIMEOUT 600 LABELS integration RUN_SERIAL TRUE)
endfunction()

tally_retention_test(ops_retention)
