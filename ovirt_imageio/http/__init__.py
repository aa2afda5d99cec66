"""Everything HTTP: servers, routing, handlers. Never run these as scripts:
this package would shadow the stdlib's http."""
