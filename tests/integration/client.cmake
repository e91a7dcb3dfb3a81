# scripts/tally_client.py, the services' side (issue 8).
set(TALLY_CLIENT_PYTHON /usr/bin/python3 CACHE FILEPATH
    "Debian's python3 (python3-confluent-kafka, python3-psycopg2)")

# Unit level, no stack: the key vectors shared with the C tests
# (schemas/examples/cache-invalidation/*/targets), validation against the
# parsers' fixtures, payloads, an unreachable broker, the exit hook.
add_test(NAME python_client
         COMMAND ${TALLY_CLIENT_PYTHON} -m unittest discover -v
                 -s ${PROJECT_SOURCE_DIR}/tests/python -p "test_*.py")
set_tests_properties(python_client PROPERTIES TIMEOUT 300 LABELS python)

# Against tally devbroker, Postgres, Redis and a running worker.
function(tally_client_test name)
  add_test(NAME integration_${name}
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_${name}.sh
                   $<TARGET_FILE:tally> $<TARGET_FILE:tally-gen>)
  set_tests_properties(integration_${name} PROPERTIES
                       TIMEOUT 300 LABELS integration RUN_SERIAL TRUE)
endfunction()

tally_client_test(client)
tally_client_test(client_fallback)
tally_client_test(client_invalidation)
