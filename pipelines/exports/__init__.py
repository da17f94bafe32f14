"""Reading data back out: the query (filters, sort, cursors) and streamed export files."""
