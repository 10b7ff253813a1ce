-- A small demo schema so the postgres toolset has something to show. Loaded by docker compose
-- (docker-entrypoint-initdb.d) and by `shoal-cluster --postgres`.

CREATE TABLE IF NOT EXISTS teams (
    id    serial PRIMARY KEY,
    name  text NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS services (
    id          serial PRIMARY KEY,
    team_id     integer NOT NULL REFERENCES teams (id),
    name        text NOT NULL UNIQUE,
    tier        text NOT NULL CHECK (tier IN ('critical', 'standard', 'experimental')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS deployments (
    id           bigserial PRIMARY KEY,
    service_id   integer NOT NULL REFERENCES services (id),
    version      text NOT NULL,
    status       text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'rolled_back')),
    deployed_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO teams (name) VALUES ('payments'), ('search'), ('platform')
ON CONFLICT DO NOTHING;

INSERT INTO services (team_id, name, tier)
SELECT t.id, s.name, s.tier
FROM (VALUES
    ('payments', 'ledger', 'critical'),
    ('payments', 'checkout', 'critical'),
    ('search', 'indexer', 'standard'),
    ('search', 'query-api', 'critical'),
    ('platform', 'mcp-gateway', 'standard'),
    ('platform', 'feature-flags', 'experimental')
) AS s (team, name, tier)
JOIN teams t ON t.name = s.team
ON CONFLICT DO NOTHING;

INSERT INTO deployments (service_id, version, status, deployed_at)
SELECT s.id,
       format('1.%s.%s', n / 3, n % 3),
       (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'rolled_back'])[1 + n % 5],
       now() - make_interval(hours => n * 7)
FROM services s CROSS JOIN generate_series(1, 8) AS n
WHERE NOT EXISTS (SELECT 1 FROM deployments);
