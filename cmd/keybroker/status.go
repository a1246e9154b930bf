package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"text/tabwriter"

	"github.com/profullstack/keybroker/pgstore/hierarchy"
	"github.com/profullstack/keybroker/provider"
	"github.com/spf13/cobra"
)

type providerStatus struct {
	Provider       string `json:"provider"`
	KeyID          string `json:"key_id"`
	Role           string `json:"role"` // "primary", "decrypt-only", "intermediate" or "intermediate-decrypt-only"
	PrimaryVersion string `json:"primary_version,omitempty"`
	Reachable      bool   `json:"reachable"`
	Error          string `json:"error,omitempty"`
}

type versionStatus struct {
	Provider string `json:"provider"`
	KeyID    string `json:"key_id"`
	Version  string `json:"version"`
	// State: "primary" (the primary provider's version: wraps new data
	// keys), "active" (still unwraps), "retired" (retired in keybroker),
	// "missing" (a configured provider serves the key but does not list the
	// version as usable: retired or destroyed in the key service, or the
	// wrong keyring), "unconfigured" (no configured provider serves the key).
	State    string `json:"state"`
	DataKeys int64  `json:"data_keys"`
	Secrets  int64  `json:"secrets"`
	// IntermediateKeys counts the key hierarchy's intermediate keys
	// wrapped under the version (a KEK version).
	IntermediateKeys int64 `json:"intermediate_keys"`
}

type projectKEKStatus struct {
	Project  string   `json:"project"`
	KEK      string   `json:"kek"` // the URL, query values redacted
	Chain    string   `json:"chain"`
	Keys     []string `json:"keys"` // provider:key_id of the KEK, as recorded
	DataKeys int64    `json:"data_keys"`
	Pending  int64    `json:"pending"` // data keys not under the project's chain yet (rewrap)
}

type recoveryKeyStatus struct {
	Recovery         string `json:"recovery"` // provider:key_id
	IntermediateKeys int64  `json:"intermediate_keys"`
}

type statusResult struct {
	Providers    []providerStatus `json:"providers"`
	Versions     []versionStatus  `json:"versions"`
	RetiredInUse int64            `json:"retired_in_use"` // data keys under retired versions
	Missing      int64            `json:"missing"`        // data keys under missing versions
	Unconfigured int64            `json:"unconfigured"`   // data keys under keys no configured provider serves
	Secrets      int64            `json:"secrets"`
	Projects     int64            `json:"projects"`
	DataKeys     map[string]int64 `json:"data_keys"` // by state: active, spent, retired
	Budget       int64            `json:"budget"`    // encryptions allowed per data key
	MaxBudgetUse int64            `json:"max_budget_use"`
	// Half-done work: versions retired in the database but live in the
	// key service (exit 5; finish with retire), and primary versions not
	// recorded yet (a warning: a rotation made elsewhere, or a rotate
	// killed before recording it; the next write or rewrap records it).
	RetiredLive       []string `json:"retired_live"`
	UnrecordedPrimary []string `json:"unrecorded_primary"`
	// Projects bound to a KEK of their own, and the recovery keys of the
	// deployment's intermediate keys (each with how many of the
	// DeploymentIntermediateKeys it wraps).
	ProjectKEKs                []projectKEKStatus  `json:"project_keks"`
	Recovery                   []recoveryKeyStatus `json:"recovery"`
	DeploymentIntermediateKeys int64               `json:"deployment_intermediate_keys"`
}

// status reports every KEK version the database records, with the data
// keys and secrets under it, and what the configured providers say of it.
// It only reads.
func (a *app) status(ctx context.Context, s *session) (*statusResult, error) {
	res := &statusResult{Providers: []providerStatus{}, Versions: []versionStatus{}}
	type desc struct {
		st provider.Status
		ok bool
	}
	described := map[provider.KeyRef]desc{}
	var unreachable error
	// The KEK's providers, then the key hierarchy's intermediate keys
	// (stored in the database; Describe reads it): "intermediate" when
	// they wrap new data keys, "intermediate-decrypt-only" with
	// --direct-kek.
	ik := s.store.Hierarchy()
	for i, p := range append(s.store.Keyring().Providers(), provider.KEKProvider(ik)) {
		ref := p.Ref()
		ps := providerStatus{Provider: ref.Provider, KeyID: ref.KeyID, Role: "decrypt-only", Reachable: true}
		switch {
		case p == provider.KEKProvider(ik) && s.store.DirectKEK():
			ps.Role = "intermediate-decrypt-only"
		case p == provider.KEKProvider(ik):
			ps.Role = "intermediate"
		case i == 0:
			ps.Role = "primary"
		}
		if d, ok := p.(provider.Describer); ok {
			st, err := d.Describe(ctx)
			if err != nil {
				ps.Reachable, ps.Error = false, err.Error()
				if unreachable == nil {
					unreachable = err
				}
			} else {
				ps.PrimaryVersion = st.PrimaryVersion
				described[ref] = desc{st, true}
			}
		}
		res.Providers = append(res.Providers, ps)
	}

	st, err := s.store.Status(ctx)
	if err != nil {
		return nil, err
	}
	res.RetiredLive, res.UnrecordedPrimary = []string{}, []string{}
	if s.store.CheckProviders(ctx, st) == nil { // a Describe error is already in unreachable
		for _, v := range st.RetiredLive {
			res.RetiredLive = append(res.RetiredLive, v.String())
		}
		for _, v := range st.UnrecordedPrimary {
			res.UnrecordedPrimary = append(res.UnrecordedPrimary, v.String())
		}
	}
	res.Secrets, res.Projects, res.DataKeys = st.Secrets, st.Projects, st.DataKeys
	res.Budget, res.MaxBudgetUse = st.Budget, st.MaxActiveUse
	// Versions of projects' own KEKs and chains are configured by their
	// bindings, not by --kek.
	tenantKeys := map[provider.KeyRef]bool{}
	res.ProjectKEKs, res.Recovery = []projectKEKStatus{}, []recoveryKeyStatus{}
	for _, b := range st.ProjectKEKs {
		ps := projectKEKStatus{Project: b.Project, KEK: redactURL(b.URL), Chain: b.Chain, Keys: []string{}, DataKeys: b.DataKeys, Pending: b.Pending}
		tenantKeys[provider.KeyRef{Provider: hierarchy.Scheme, KeyID: b.Chain}] = true
		for _, k := range b.KEKs {
			tenantKeys[k] = true
			ps.Keys = append(ps.Keys, k.String())
		}
		res.ProjectKEKs = append(res.ProjectKEKs, ps)
	}
	for _, r := range st.Recovery {
		res.Recovery = append(res.Recovery, recoveryKeyStatus{Recovery: r.Provider + ":" + r.KeyID, IntermediateKeys: r.IntermediateKeys})
	}
	res.DeploymentIntermediateKeys = st.IntermediateKeys
	primary := provider.KeyRef{Provider: res.Providers[0].Provider, KeyID: res.Providers[0].KeyID}
	listed := map[versionKey]bool{}
	for _, sv := range st.Versions {
		v := versionStatus{Provider: sv.Provider, KeyID: sv.KeyID, Version: sv.Version, DataKeys: sv.DataKeys, Secrets: sv.Secrets,
			IntermediateKeys: sv.IntermediateKeys}
		ref := provider.KeyRef{Provider: v.Provider, KeyID: v.KeyID}
		d := described[ref]
		configured := slices.ContainsFunc(res.Providers, func(p providerStatus) bool { return p.Provider == ref.Provider && p.KeyID == ref.KeyID })
		switch {
		case sv.RetiredAt != nil:
			v.State = "retired"
			res.RetiredInUse += v.DataKeys
		case tenantKeys[ref]:
			v.State = "project" // a project's own KEK or chain: see project_keks
		case !configured:
			v.State = "unconfigured"
			res.Unconfigured += v.DataKeys
		case d.ok && len(d.st.Versions) > 0 && !slices.Contains(d.st.Versions, v.Version):
			// Describe lists only usable versions, so whether the key
			// service retired this one or never had it (another keyring
			// with the same id) cannot be told apart here.
			v.State = "missing"
			res.Missing += v.DataKeys
		case (ref == primary || ref == ik.Ref() && !s.store.DirectKEK()) && d.ok && v.Version == d.st.PrimaryVersion:
			v.State = "primary"
		default:
			v.State = "active"
		}
		listed[versionKey{ref, v.Version}] = true
		res.Versions = append(res.Versions, v)
	}
	// A primary version that has wrapped nothing yet is still worth showing.
	if v := res.Providers[0].PrimaryVersion; v != "" && !listed[versionKey{primary, v}] {
		res.Versions = append(res.Versions, versionStatus{Provider: primary.Provider, KeyID: primary.KeyID, Version: v, State: "primary"})
	}
	return res, unreachable
}

type versionKey struct {
	ref     provider.KeyRef
	version string
}

func newStatusCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Report data keys and secrets per KEK provider and version",
		Long: `status lists each configured KEK provider (primary first, then the
decrypt-only ones, then the intermediate keys of the key hierarchy) and
every KEK and intermediate key version the database records, with how
many data keys and secrets depend on it and its state: primary (the
primary provider's current version), active (still unwraps), retired
(retired in keybroker), missing (the configured provider serves the key
but not this version: retired or destroyed in the key service, or the
wrong keyring), or unconfigured (no configured provider serves the key).
It only reads.

Exit status 3 when a retired or missing version still wraps data keys (run
rewrap with a provider that can still unwrap them); 5 when a retire is half
done (a version retired in the database but still live in the key service:
run retire VERSION); 1 when a key service is unreachable. A primary version
not recorded in the database yet (a rotation made in the key service, or a
rotate killed before recording it) is a warning: rewrap records it.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			res, err := a.status(cmd.Context(), s)
			if res == nil {
				return err
			}
			if e := a.emit(res, res.print); e != nil {
				return e
			}
			switch {
			case err != nil:
				return fmt.Errorf("status: %w", err)
			case res.RetiredInUse > 0:
				return &codeError{code: exitRetiredUsed, err: fmt.Errorf("status: %d data keys are still wrapped under retired KEK versions: rewrap them", res.RetiredInUse)}
			case res.Missing > 0:
				return &codeError{code: exitRetiredUsed, err: fmt.Errorf("status: %d data keys are under key versions no configured provider can unwrap: configure the right keyring or key service, or rewrap them with one that can", res.Missing)}
			case len(res.RetiredLive) > 0:
				return incomplete("status: %s retired in the database but still live in the key service: run keybroker retire %s", res.RetiredLive[0], res.RetiredLive[0])
			}
			return nil
		},
	}
}

func (r *statusResult) print(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROVIDER\tKEY\tROLE\tPRIMARY VERSION\tREACHABLE")
	for _, p := range r.Providers {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%t\n", p.Provider, p.KeyID, p.Role, p.PrimaryVersion, p.Reachable)
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "PROVIDER\tKEY\tVERSION\tSTATE\tDATA KEYS\tSECRETS")
	for _, v := range r.Versions {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\n", v.Provider, v.KeyID, v.Version, v.State, v.DataKeys, v.Secrets)
	}
	tw.Flush()
	fmt.Fprintf(w, "\n%d secrets in %d projects; data keys: %d active, %d spent, %d retired; busiest active key used %d of %d encryptions\n",
		r.Secrets, r.Projects, r.DataKeys["active"], r.DataKeys["spent"], r.DataKeys["retired"], r.MaxBudgetUse, r.Budget)
	for _, v := range r.RetiredLive {
		fmt.Fprintf(w, "warning: %s is retired in the database but still live in the key service: run keybroker retire %s\n", v, v)
	}
	for _, v := range r.UnrecordedPrimary {
		fmt.Fprintf(w, "warning: primary version %s is not recorded in the database yet (rewrap records it)\n", v)
	}
	if r.Missing > 0 {
		fmt.Fprintf(w, "warning: %d data keys are under key versions the configured providers do not have (retired or destroyed in the key service, or the wrong keyring)\n", r.Missing)
	}
	if r.Unconfigured > 0 {
		fmt.Fprintf(w, "warning: %d data keys are under keys no configured provider serves\n", r.Unconfigured)
	}
	if len(r.ProjectKEKs) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PROJECT\tOWN KEK\tCHAIN\tDATA KEYS\tNOT MOVED YET")
		for _, p := range r.ProjectKEKs {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\n", p.Project, p.KEK, p.Chain, p.DataKeys, p.Pending)
		}
		tw.Flush()
		for _, p := range r.ProjectKEKs {
			if p.Pending > 0 {
				fmt.Fprintf(w, "warning: project %q has %d data keys not under its own KEK yet: run keybroker rewrap\n", p.Project, p.Pending)
			}
		}
	}
	for _, k := range r.Recovery {
		fmt.Fprintf(w, "recovery key %s wraps %d of %d intermediate keys\n", k.Recovery, k.IntermediateKeys, r.DeploymentIntermediateKeys)
		if k.IntermediateKeys < r.DeploymentIntermediateKeys {
			fmt.Fprintf(w, "warning: %d intermediate keys have no wrap under recovery key %s: run keybroker recovery add --recovery URL\n", r.DeploymentIntermediateKeys-k.IntermediateKeys, k.Recovery)
		}
	}
}
