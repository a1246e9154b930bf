create table projects (id uuid primary key default gen_random_uuid(), owner uuid not null,
  name text not null, created_at timestamptz not null default now(), updated_at timestamptz not null default now());
create table secrets (id uuid primary key default gen_random_uuid(),
  project_id uuid not null references projects(id) on delete cascade, key text not null,
  value_encrypted bytea not null, created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(), unique(project_id, key));
