# tally devbroker + tally produce end to end (needs kcat and
# python3-confluent-kafka, both installed by scripts/deps.sh).
add_test(NAME integration_devbroker
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_devbroker.sh
                 $<TARGET_FILE:tally>)
set_tests_properties(integration_devbroker PROPERTIES
                     TIMEOUT 120 LABELS integration)
