#!/bin/sh
# Entry point of the echo agent: serve /www over HTTP on port 80 in the foreground.
# busybox httpd logs each request to stderr (-v), and the CGI script adds its own line.
echo "echo-agent: listening on port 80"
exec busybox httpd -f -v -p 80 -h /www
