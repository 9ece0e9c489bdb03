"""Transfer connectors that move whole cache blocks between engines (installed as kvlayout.connectors)."""
