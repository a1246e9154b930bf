package server

import (
	"errors"
	"net/http"
	"strconv"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgcolumn"
)

// MaxOpenMany bounds the items of one open-many request.
const MaxOpenMany = 1000

// columnRef names where the application stores a sealed value: its
// table, column and row key (pgcolumn.Context), bound into the value's
// associated data.
type columnRef struct {
	Table  string   `json:"table"`
	Column string   `json:"column"`
	Row    []string `json:"row"`
}

func (c columnRef) context() pgcolumn.Context {
	return pgcolumn.Context{Table: c.Table, Column: c.Column, Row: c.Row}
}

type sealBody struct {
	columnRef
	Value *[]byte `json:"value"`
}

type sealResponse struct {
	Sealed []byte `json:"sealed"`
}

type openItem struct {
	columnRef
	Sealed *[]byte `json:"sealed"`
}

type openManyBody struct {
	Items []openItem `json:"items"`
}

type openManyResponse struct {
	Values [][]byte `json:"values"`
}

// columnError answers for pgcolumn's errors, then falls back to storeError.
func (s *Server) columnError(w http.ResponseWriter, req *request, err error) {
	switch {
	case errors.Is(err, pgcolumn.ErrInvalidArgument):
		m := err.Error()
		writeError(w, http.StatusBadRequest, "invalid_request", m[len("pgcolumn: "):])
	case errors.Is(err, envelope.ErrDecrypt):
		// The caller's bytes do not open under this project and context.
		writeError(w, http.StatusBadRequest, "decrypt_failed", "sealed value does not open for this project, table, column and row")
	default:
		s.storeError(w, req, err)
	}
}

func columnOutcome(err error) string {
	switch {
	case err == nil:
		return outcomeOK
	case errors.Is(err, pgcolumn.ErrInvalidArgument):
		return outcomeInvalid
	default:
		return classify(err)
	}
}

func (s *Server) seal(w http.ResponseWriter, r *http.Request, req *request) {
	var body sealBody
	if !s.decode(w, r, &body) {
		return
	}
	if body.Value == nil {
		writeError(w, http.StatusBadRequest, "invalid_request", "value is required")
		return
	}
	defer clear(*body.Value)
	sealed, err := pgcolumn.SealContext(req.ctx, s.store, req.project, body.context(), *body.Value)
	if s.logged(w, req, []string{body.Table + "." + body.Column}, err, columnOutcome, s.columnError) {
		writeJSON(w, sealResponse{Sealed: sealed})
	}
}

func (s *Server) open(w http.ResponseWriter, r *http.Request, req *request) {
	var body openItem
	if !s.decode(w, r, &body) {
		return
	}
	s.openItems(w, req, []openItem{body}, false)
}

func (s *Server) openMany(w http.ResponseWriter, r *http.Request, req *request) {
	var body openManyBody
	if !s.decode(w, r, &body) {
		return
	}
	if body.Items == nil {
		writeError(w, http.StatusBadRequest, "invalid_request", "items is required")
		return
	}
	if len(body.Items) > MaxOpenMany {
		writeError(w, http.StatusBadRequest, "invalid_request", strconv.Itoa(len(body.Items))+" items, more than "+strconv.Itoa(MaxOpenMany))
		return
	}
	s.openItems(w, req, body.Items, true)
}

// openItems opens every item, all or nothing, records one access-log row
// and answers.
func (s *Server) openItems(w http.ResponseWriter, req *request, items []openItem, many bool) {
	names := make([]string, len(items))
	for i, it := range items {
		names[i] = it.Table + "." + it.Column
		if it.Sealed == nil {
			writeError(w, http.StatusBadRequest, "invalid_request", "sealed is required")
			return
		}
	}
	values := make([][]byte, 0, len(items))
	defer func() {
		for _, v := range values {
			clear(v)
		}
	}()
	var err error
	for _, it := range items {
		var v []byte
		if v, err = pgcolumn.OpenContext(req.ctx, s.store, req.project, it.context(), *it.Sealed); err != nil {
			break
		}
		values = append(values, v)
	}
	if !s.logged(w, req, names, err, columnOutcome, s.columnError) {
		return
	}
	if many {
		writeJSON(w, openManyResponse{Values: values})
		return
	}
	writeJSON(w, valueResponse{Value: values[0]})
}
