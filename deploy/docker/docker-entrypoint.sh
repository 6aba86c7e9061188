#!/bin/sh
# The image's entrypoint: runs `tinyfleet "$@"` after turning every variable
#   TINYFLEET_FILE__<SECTION>__<FIELD>=/path/to/file
# (a Docker or Kubernetes secret mounted as a file) into
#   TINYFLEET__<SECTION>__<FIELD>=<the file's content, trailing newlines removed>
# so that secrets never appear in the compose file, the container's configuration or
# `docker inspect`. tinyfleet itself ignores TINYFLEET_FILE__ variables.
set -eu

for var in $(env | sed -n 's/^\(TINYFLEET_FILE__[A-Za-z0-9_]*\)=.*/\1/p'); do
    file=$(printenv "$var") || continue
    if [ ! -r "$file" ]; then
        echo "tinyfleet: $var names $file, which cannot be read by uid $(id -u)" >&2
        exit 64
    fi
    name="TINYFLEET__${var#TINYFLEET_FILE__}"
    value=$(cat "$file")
    export "$name=$value"
    unset "$var"
done

exec /usr/local/bin/tinyfleet "$@"
