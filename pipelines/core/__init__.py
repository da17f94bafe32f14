"""Infrastructure every domain stands on: settings, the database (engine, sessions, models,
migrations), the embedded servers, logging, runtime settings, prefetching and keyset pages."""
