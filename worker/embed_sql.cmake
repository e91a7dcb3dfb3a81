# Generates a C file holding every sql/*.sql migration, in name order, so
# the binary carries its own schema: cmake -DSQL_DIR=.. -DOUT=.. -P this.
file(GLOB files "${SQL_DIR}/*.sql")
list(SORT files)
set(defs "")
set(table "")
set(i 0)
foreach(f IN LISTS files)
  get_filename_component(name "${f}" NAME)
  file(READ "${f}" hex HEX)
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
  string(APPEND defs "static const char migration_${i}[] = {${bytes}0x00};\n")
  string(APPEND table "    {\"${name}\", migration_${i}},\n")
  math(EXPR i "${i} + 1")
endforeach()
file(WRITE "${OUT}.tmp"
"/* Generated from sql/ by embed_sql.cmake: the schema migrations. */
#include \"migrations.h\"

${defs}
const migration_t migrations[] = {
${table}};
const size_t migrations_count = ${i};
")
file(COPY_FILE "${OUT}.tmp" "${OUT}" ONLY_IF_DIFFERENT)
