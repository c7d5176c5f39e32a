// Reconcile scenarios against a mocked API server (tower-test).
