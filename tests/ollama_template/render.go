// Renders Modelfile TEMPLATEs the way Ollama's server does, with Go's own text/template: the test's stand-in for
// `ollama create` + a chat request, which cannot run here. Reads JSON on stdin:
//
//	{"template": "...", "system": "...", "cases": [{"messages": [{"role": ..., "content": ..., "thinking": ...}], "think": false}]}
//
// and writes a JSON list with one rendered prompt per case. What it does before executing the template follows
// Ollama (server/routes.go, template/template.go): the Modelfile's SYSTEM goes in front of a conversation without a
// system message; consecutive messages of one role (except tool) are merged with "\n\n"; .System is every system
// message joined with "\n\n"; the template is parsed with missingkey=zero and a `json` function.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role     string `json:"role"`
	Content  string `json:"content"`
	Thinking string `json:"thinking"`
}

type Case struct {
	Messages []Message `json:"messages"`
	Think    bool      `json:"think"`
}

type Request struct {
	Template string `json:"template"`
	System   string `json:"system"`
	Cases    []Case `json:"cases"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var request Request
	if err := json.NewDecoder(os.Stdin).Decode(&request); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(request.Template))
	var rendered []string
	for _, c := range request.Cases {
		msgs := c.Messages
		if (len(msgs) == 0 || msgs[0].Role != "system") && request.System != "" {
			msgs = append([]Message{{Role: "system", Content: request.System}}, msgs...)
		}
		system, messages := collate(msgs)
		var b bytes.Buffer
		err := tmpl.Execute(&b, map[string]any{"System": system, "Messages": messages, "Response": "", "Think": c.Think})
		if err != nil {
			panic(err)
		}
		rendered = append(rendered, b.String())
	}
	out, _ := json.Marshal(rendered)
	os.Stdout.Write(out)
}
