"""Jobs, one model for every kind of background work: the state machine (create, claim,
heartbeat, finish, cancel, reap), the events journal, source schedules and the status overview."""
