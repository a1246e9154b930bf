//go:build linux

package crashtest

import (
	"fmt"
	"strconv"
	"testing"
)

// TestCrashImport SIGKILLs `import-plaintext --clear-plaintext` of a
// 20,000-row table (in four rounds of 5,000 new rows, three kills each). After every kill: as many source values cleared as secrets
// stored, and as many migrated rows audited. After each round's rerun:
// nothing left to import, every secret byte-exact, audit exact.
func TestCrashImport(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	src := newSource(e, "legacy")
	const perRound, batch = 5000, 40
	args := src.importArgs("--clear-plaintext", "--batch", strconv.Itoa(batch))
	rounds := 4 * scale(t)
	next := int64(1)
	for round := range rounds {
		fresh := src.add(e, next, next+perRound, func(id int64) string { return fmt.Sprintf("project-%02d", id%50) })
		next += perRound
		for range 3 {
			pending := e.count("SELECT count(*) FROM legacy WHERE secret IS NOT NULL")
			if pending == 0 {
				break
			}
			if o := e.runKilled(e.linePlan(int(pending/batch)), args...); o.killed {
				e.checkImport("after-kill")
			}
		}
		e.finish(args...)
		e.checkImport("after-rerun")
		left := e.count("SELECT count(*) FROM legacy WHERE secret IS NOT NULL")
		e.checks.ok("import-complete", left == 0, "%d source values not imported after the rerun", left)
		e.checkAudit()
		// Earlier rounds' secrets were checked then; a sample of them again.
		e.checkSecrets(src.values, append(fresh, e.sample(src.all(), 300)...), true)
		e.checkCLI(round == rounds-1) // verify decrypts everything: once, at the end
		e.checkKeys(1, 0)
	}
}

// checkImport checks what holds at any instant of a --clear-plaintext
// import: each cleared source value is stored, and audited.
func (e *env) checkImport(when string) {
	e.t.Helper()
	stored := e.count("SELECT count(*) FROM " + schema + ".encrypted_secrets")
	cleared := e.count("SELECT count(*) FROM legacy WHERE secret IS NULL")
	e.checks.ok("import-cleared-equals-stored-"+when, stored == cleared, "%d secrets stored, %d source values cleared", stored, cleared)
	audited, inserted := e.eventSum("migrate.plaintext"), e.changed("secret.insert")
	e.checks.ok("audit-migrate.plaintext-"+when, audited == inserted, "migrate.plaintext events count %d rows, %d were migrated", audited, inserted)
}

// TestCrashRewrap SIGKILLs `rotate` once per round (between the keyring
// write and its audit event, during the keyring write, or during its
// rewrap), then `rewrap --batch 10` of 600 data keys two or three times,
// and finishes with a plain `rewrap`. Each round must add exactly one
// keyring version.
func TestCrashRewrap(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	src := newSource(e, "legacy")
	const projects, batch = 600, 10
	src.add(e, 1, projects+1, func(id int64) string { return fmt.Sprintf("p%03d", id) })
	e.must(src.importArgs("--batch", "300")...)
	rotate := []string{"rotate", "--batch", strconv.Itoa(batch)}
	rewrap := []string{"rewrap", "--batch", strconv.Itoa(batch)}
	primary := uint32(1)
	for range 4 * scale(t) {
		for attempt := 0; attempt < 3 && e.readKeyring().Primary == primary; attempt++ {
			var p plan
			switch e.rng.IntN(4) {
			case 0:
				p = plan{kind: eventsLocked} // from the start: after the keyring write, before the rotation's event
			case 1:
				p = plan{kind: tmpCreated, n: 1}
			default:
				p = e.linePlan(projects / batch)
			}
			e.runKilled(p, rotate...)
		}
		if e.readKeyring().Primary == primary {
			e.finish(rotate...) // killed before it rotated, three times: rerun it whole
		}
		primary++
		for range 2 + e.rng.IntN(2) {
			pending := e.offPrimary()
			if pending == 0 {
				break
			}
			e.runKilled(e.linePlan(int(pending/batch)), rewrap...)
		}
		e.finish(rewrap...)
		e.checkAudit()
		e.checkKeys(primary, 0)
		e.checkSecrets(src.values, src.all(), true)
		e.checkCLI(true)
	}
}

// offPrimary counts the data keys not under the keyring file's primary.
func (e *env) offPrimary() int64 {
	kf := e.readKeyring()
	return e.count(`SELECT count(*) FROM `+schema+`.data_keys d JOIN `+schema+`.kek k ON k.id = d.kek_id
WHERE NOT (k.provider = 'local' AND k.key_id = $1 AND k.key_version = $2)`, keyringID, strconv.FormatUint(uint64(kf.Primary), 10))
}

// TestCrashReencrypt SIGKILLs `reencrypt big --batch 20` (1,500 secrets)
// three times in each of four rounds and finishes with a plain rerun: every secret of
// big under its one active data key, no retired key left, the other
// project untouched.
func TestCrashReencrypt(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	src := newSource(e, "legacy")
	src.add(e, 1, 1501, func(int64) string { return "big" })
	src.add(e, 1501, 1701, func(int64) string { return "other" })
	e.must(src.importArgs("--batch", "500")...)
	other := e.projectDigest("other")
	args := []string{"reencrypt", "big", "--batch", "20"}
	for range 4 * scale(t) {
		for range 3 {
			// reencrypt logs little per batch: progress at every tenth.
			e.runKilled(e.linePlan(14), args...)
		}
		e.finish(args...)
		retired := e.count("SELECT count(*) FROM " + schema + ".data_keys WHERE project_id = 'big' AND state <> 'active'")
		e.checks.ok("reencrypt-old-keys-gone", retired == 0, "project big still has %d data keys that are not active", retired)
		stale := e.count(`SELECT count(*) FROM ` + schema + `.encrypted_secrets s JOIN ` + schema + `.data_keys d ON d.id = s.data_key_id
WHERE s.project_id = 'big' AND d.state <> 'active'`)
		e.checks.ok("reencrypt-all-moved", stale == 0, "%d secrets of big not under its active data key", stale)
		e.checks.ok("reencrypt-other-untouched", e.projectDigest("other") == other, "project other's secrets or data keys changed")
		e.checkAudit()
		e.checkKeys(1, 0)
		e.checkSecrets(src.values, src.all(), true)
		e.checkCLI(true)
	}
}

// projectDigest is a digest of a project's stored secrets and data keys.
func (e *env) projectDigest(project string) string {
	e.t.Helper()
	var d string
	if err := e.pool.QueryRow(e.ctx, `SELECT md5(
  coalesce((SELECT string_agg(name || ':' || encode(encrypted_data, 'hex') || ':' || data_key_id, ',' ORDER BY name)
    FROM `+schema+`.encrypted_secrets WHERE project_id = $1), '') || '|' ||
  coalesce((SELECT string_agg(id || ':' || state || ':' || encode(wrapped_dek, 'hex'), ',' ORDER BY id)
    FROM `+schema+`.data_keys WHERE project_id = $1), ''))`, project).Scan(&d); err != nil {
		e.t.Fatal(err)
	}
	return d
}

// TestCrashRotateRetire SIGKILLs `rotate --retire` on the local keyring
// file once per round, anywhere from the keyring write to the retirement,
// and sometimes the `retire VERSION` that finishes it. Right after a kill
// that left the keyring and the database disagreeing about the retirement,
// `keybroker status` must exit non-zero. The rerun is what the state calls
// for: `rotate --retire` again if nothing rotated, else `rewrap` and
// `retire VERSION` (rerunning `rotate --retire` would rotate again).
func TestCrashRotateRetire(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	src := newSource(e, "legacy")
	const projects, batch = 300, 25
	src.add(e, 1, projects+1, func(id int64) string { return fmt.Sprintf("p%03d", id) })
	e.must(src.importArgs("--batch", "300")...)
	rotate := []string{"rotate", "--retire", "--batch", strconv.Itoa(batch)}
	primary := uint32(1)
	for range 8 * scale(t) {
		from := primary
		o := e.runKilled(e.retirePlan(from, true, projects/batch), rotate...)
		e.checkHalfRetire(o, from)
		switch {
		case e.readKeyring().Primary == from:
			e.finish(rotate...) // it had not rotated yet: a plain rerun
		case o.killed:
			retire := []string{"retire", kekVersion(from)}
			e.finish("rewrap", "--batch", strconv.Itoa(batch))
			if e.rng.IntN(2) == 0 {
				o := e.runKilled(e.retirePlan(from, false, 2), retire...)
				e.checkHalfRetire(o, from)
			}
			e.finish(retire...)
		}
		primary = from + 1
		e.checkKeys(primary, primary)
		e.checkAudit()
		e.checkSecrets(src.values, src.all(), true)
		e.checkCLI(true)
	}
}

// kekVersion names keyring version v as status prints it.
func kekVersion(v uint32) string { return fmt.Sprintf("local:%s@%d", keyringID, v) }

// retirePlan draws a kill point for a command that retires version from
// (rotating first when rotates is set) and prints about lines lines.
func (e *env) retirePlan(from uint32, rotates bool, lines int) plan {
	switch e.rng.IntN(7) {
	case 0, 1:
		return plan{kind: retireEventsLocked, version: from}
	case 2:
		return plan{kind: retireKeyringLocked, version: from}
	case 3:
		n := 1
		if rotates && e.rng.IntN(2) == 0 {
			n = 2 // the retirement's write, after the rotation's
		}
		return plan{kind: tmpCreated, n: n}
	case 4:
		if rotates {
			return plan{kind: eventsLocked} // after the keyring write, before the rotation's event
		}
	}
	return e.linePlan(lines)
}

// checkHalfRetire checks, right after a kill, that `keybroker status`
// exits non-zero when the keyring and the kek table disagree on whether
// version from is retired.
func (e *env) checkHalfRetire(o outcome, from uint32) {
	e.t.Helper()
	if !o.killed {
		return
	}
	kf := e.readKeyring()
	row, recorded := e.kekRows()[from]
	if !recorded || kf.retired(from) == row.retired {
		return
	}
	code, out, _ := e.run("status")
	e.checks.ok("status-reports-half-retire", code != 0,
		"after a kill %s: keyring retired v%d %t, kek.retired_at set %t, but status exits 0: %s",
		o.where, from, kf.retired(from), row.retired, lastLines(out, 4))
}
